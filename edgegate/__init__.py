"""edgegate: deploy conditional-computation networks to edge targets."""
__version__ = "0.1.0"
