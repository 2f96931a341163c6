"""mmcds: multimodal clinical decision support over CDS Hooks, FHIR R4 and DICOMweb."""

__version__ = "0.1.0"
