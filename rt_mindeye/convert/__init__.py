"""rt_mindeye.convert"""
