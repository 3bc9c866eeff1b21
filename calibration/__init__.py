"""fp16 / int8 (Q/DQ) graph variants, calibration data and accuracy comparison (SPEC §4.4)."""
