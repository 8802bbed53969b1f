"""Ray Serve application: a FastAPI ingress in front of one deployment per model."""
