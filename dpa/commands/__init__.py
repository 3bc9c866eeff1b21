"""The commands that compose the packages (`dpa bench`, `dpa demo`): the top floor, above calibration."""
