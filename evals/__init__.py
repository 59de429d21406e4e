"""llmpatch evaluation suites (installed as `llmpatch.evals`)."""
