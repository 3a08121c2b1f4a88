"""dff.export"""
