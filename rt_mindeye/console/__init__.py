"""rt_mindeye.console"""
