"""dff.runtime"""
