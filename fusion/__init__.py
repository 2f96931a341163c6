"""The fusion model, its training, calibration and evaluation (imported as ``mmcds.fusion``)."""
