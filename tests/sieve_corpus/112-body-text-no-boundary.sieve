# envelope: from=alice@example.org to=customer@example.com message=messages/multipart.eml
require ["fileinto", "body"];
if body :text :contains "--INNER" {
  fileinto "yes";
} else {
  fileinto "no";
}
