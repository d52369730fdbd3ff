"""fvar studio: the models in a browser (Gradio), a presentation layer over the library."""
