"""What people look at: the workspace as labelled Python objects (notebooks) and the HTML report."""
