"""Serving: the serve spec, deploying it on Ray Serve, the deployment's MLflow run, background deployments."""
