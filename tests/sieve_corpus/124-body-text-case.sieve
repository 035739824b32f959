# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "body"];
if body :text :contains "XYZZY" {
  fileinto "yes";
} else {
  fileinto "no";
}
