"""What is specific to the face-landmark condition: synthetic faces, landmark geometry, drawing."""
