"""Engines as Ray Serve replicas behind one API process (`fulmine serve --replicas N`): the top floor,
above the server, whose API it serves."""
