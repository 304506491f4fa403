"""postprocess"""
