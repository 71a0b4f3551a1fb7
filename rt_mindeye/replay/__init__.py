"""rt_mindeye.replay"""
