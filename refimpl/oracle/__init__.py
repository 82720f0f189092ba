"""The oracle tools: named trace sites of a forward pass (`trace`), and comparing two traces (`compare`)."""
