"""The pure scoring core: values in, values out (no env, files, clock, network or database).

Public modules: ``scoring.spec`` (pipeline spec, ``load_spec``), ``scoring.profile`` (``LeadProfile``,
``Activity``), ``scoring.training`` (``train_pipeline``), ``scoring.pipeline`` (``compile_pipeline``,
``CompiledPipeline``, ``Score``), ``scoring.errors``. Nothing is imported here, so importing a spec
does not pay for scikit-learn.
"""
