"""Calibration: statistics requests, the collector that fills them, and calibration/evaluation text."""
