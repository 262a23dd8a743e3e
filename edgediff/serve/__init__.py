"""edgediff serve and batch: the OpenAI images API (FastAPI), Ray Serve and Ray Data. Needs the serve / ray extras."""
