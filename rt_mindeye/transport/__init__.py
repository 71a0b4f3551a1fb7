"""rt_mindeye.transport"""
