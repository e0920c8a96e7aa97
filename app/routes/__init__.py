"""HTTP routes: thin handlers that validate, call one service function and map domain errors to statuses."""
