"""dff.data"""
