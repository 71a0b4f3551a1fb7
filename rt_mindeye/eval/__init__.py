"""rt_mindeye.eval"""
