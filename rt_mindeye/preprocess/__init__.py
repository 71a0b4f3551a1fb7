"""rt_mindeye.preprocess"""
