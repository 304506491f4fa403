"""Synthetic spine phantoms: anatomical label maps (``anatomy``), T2w rendering (``render``),
a demo BIDS dataset (``demo``) and size measurements for calibration (``calibrate``).

Import the submodules directly (``from spineps.synth.anatomy import make_phantom``); this
package imports nothing heavy itself.
"""
