"""Image, text and lab encoders and their explainers (imported as ``mmcds.encoders``)."""
