"""The local web dashboard and JSON API (FastAPI + uvicorn), served by the daemon over HTTPS."""
