"""Development helpers: the local FHIR sandbox and Orthanc, and ``mmcds demo``."""
