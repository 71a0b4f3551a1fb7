"""rt_mindeye.phantom"""
