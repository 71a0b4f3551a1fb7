"""rt_mindeye.decode"""
