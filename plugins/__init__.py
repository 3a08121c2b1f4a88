"""dff.plugins"""
