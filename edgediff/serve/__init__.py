"""edgediff serve and batch: the OpenAI images API (FastAPI), Ray Serve and Ray Data. Needs the serve / ray extras."""

BUILTIN_ID = "edgediff-builtin"  # the built-in model's id in /v1/models and in batch results
