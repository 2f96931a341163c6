"""FHIR client, gather (FHIR -> record), DICOMweb and write-back (imported as ``mmcds.fhir``).

``fhir.resources`` installs a regular top-level package named ``fhir``; run from the repo root,
this folder would shadow it. Extending ``__path__`` lets both be found whichever comes first.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
