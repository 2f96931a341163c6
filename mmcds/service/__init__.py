"""The service layer: the analysis service every trigger calls, the CDS Hooks HTTP API, JWT
verification, CDS cards, the analysis store and the write-back outbox."""
