"""pacs-landmarks: craniofacial landmark localisation on CT for PACS, results as DICOM SR and SEG."""

__version__ = "0.1.0"
