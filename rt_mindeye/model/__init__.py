"""rt_mindeye.model"""
