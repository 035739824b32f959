# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "variables"];
if address :matches :domain "from" "*.*" {
  fileinto "${2}/${1}";
}
