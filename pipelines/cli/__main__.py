"""`python -m pipelines.cli ...`: the same as the `sparta` console script (Ray Jobs run it this way)."""
from pipelines.cli import app

app()
