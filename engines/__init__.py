"""dff.engines"""
