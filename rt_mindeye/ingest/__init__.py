"""rt_mindeye.ingest"""
