"""dff.models"""
