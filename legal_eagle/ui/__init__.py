"""The Gradio user interface: one module per tab, ``build_app`` assembles them."""
