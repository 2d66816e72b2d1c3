"""`python -m t2i.cli`, and `accelerate launch -m t2i.cli ...`."""

from t2i.cli.main import run

run()
