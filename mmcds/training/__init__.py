"""Training and evaluation from a cohort folder: read examples, encode, train, calibrate."""
