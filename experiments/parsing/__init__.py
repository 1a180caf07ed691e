"""Chen & Manning's transition parser trained with meProp (``python -m experiments.parsing``)."""
