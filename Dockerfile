# Leadscore service image. Migrations are a separate command: `docker run IMAGE leadscore migrate`.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY scoring ./scoring
COPY models ./models
COPY migrations ./migrations
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    LEADSCORE_HOST=0.0.0.0 LEADSCORE_PORT=8000 LEADSCORE_LOG_FORMAT=json LEADSCORE_VAR_DIR=/app/var
RUN useradd --create-home --uid 10001 leadscore
COPY --from=build /install /usr/local
WORKDIR /app
RUN mkdir -p /app/var && chown leadscore:leadscore /app/var
USER leadscore
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
CMD ["leadscore", "serve"]
