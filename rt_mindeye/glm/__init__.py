"""rt_mindeye.glm"""
