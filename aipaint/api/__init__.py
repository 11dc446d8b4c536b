"""The request and result types users build and get back, and typed plugin options."""
