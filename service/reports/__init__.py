"""Reports for ops and sales leaders: funnel, score bands, routing balance, model health.

Each report is a use case `<name>_report(engine, *, period, ..., now)` returning a pydantic model
whose `rows` are the table a CSV export carries (one row per line, flat values); the other fields
(period, totals, warnings) ride only in the JSON form. SQL stays in the repositories
(`service/repositories/*_reports.py`).
"""
