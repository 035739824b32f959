# envelope: from=alice@example.org to=francois@example.fr message=messages/encoded.eml
require ["fileinto", "body"];
if body :text :contains "schöne" {
  fileinto "yes";
} else {
  fileinto "no";
}
