"""rt_mindeye.calibration"""
